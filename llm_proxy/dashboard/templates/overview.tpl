% rebase('layout', title=title, session=session, csrf=csrf, poll=poll)
<h1>Overview</h1>
<p class="hint" aria-live="polite"><span data-field="updated">Updates every {{poll}} s.</span></p>
<section aria-labelledby="queue-h">
  <h2 id="queue-h">Queue <small>(the whole service)</small></h2>
  <div class="stats">
    <div class="stat"><span class="label">Waiting</span><span class="value" data-field="waiting">{{waiting}}</span></div>
    <div class="stat"><span class="label">In flight</span><span class="value"><span data-field="in_flight">{{in_flight}}</span> / <span data-field="max_concurrent">{{max_concurrent}}</span></span></div>
  </div>
</section>
<section aria-labelledby="hour-h">
  <h2 id="hour-h">Your requests, last hour</h2>
  <div class="stats">
    <div class="stat"><span class="label">Completed</span><span class="value" data-field="completed">{{completed}}</span></div>
    <div class="stat"><span class="label">Failed</span><span class="value bad" data-field="failed">{{failed}}</span></div>
    <div class="stat"><span class="label">Upstream p50</span><span class="value" data-field="latency_p50">{{latency_p50}}</span></div>
    <div class="stat"><span class="label">Upstream p95</span><span class="value" data-field="latency_p95">{{latency_p95}}</span></div>
    <div class="stat"><span class="label">Webhooks pending</span><span class="value" data-field="webhooks_pending">{{webhooks_pending}}</span></div>
    <div class="stat"><span class="label">Webhooks failed</span><span class="value bad" data-field="webhooks_failed">{{webhooks_failed}}</span></div>
  </div>
  <figure class="card">
    <div data-chart>{{!chart}}</div>
    <figcaption>Finished per minute over the last hour (peak <span data-field="per_minute_peak">{{per_minute_peak}}</span>):
      <span class="key done">completed</span> <span class="key failed">failed</span>.
      Latencies over the latest <span data-field="latency_samples">{{latency_samples}}</span> calls.</figcaption>
  </figure>
</section>
% if rate_limits:
<section aria-labelledby="limits-h">
  <h2 id="limits-h">Rate limits per model</h2>
  <div class="scroll"><table>
    <thead><tr>
    % for column in rate_limits[0]:
      <th scope="col">{{column}}</th>
    % end
    </tr></thead>
    <tbody>
    % for limits in rate_limits:
      <tr>
      % for value in limits.values():
        <td>{{value}}</td>
      % end
      </tr>
    % end
    </tbody>
  </table></div>
</section>
% end
<section aria-labelledby="recent-h">
  <h2 id="recent-h">Latest requests</h2>
  % include('rows', rows=recent, caption='Your latest requests')
  <p><a href="/dashboard/requests">All requests, with filters</a></p>
</section>
