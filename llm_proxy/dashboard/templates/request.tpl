% rebase('layout', title=title, session=session, csrf=csrf, poll=0)
<p><a href="/dashboard/requests">All requests</a></p>
<h1 class="id">{{id}}</h1>
% if notice:
<p class="notice" role="status">{{notice}}</p>
% end
<dl class="facts">
  <div><dt>Status</dt><dd><span class="badge {{status}}">{{status}}</span>{{' (place %d in line)' % position if position else ''}}</dd></div>
  <div><dt>Endpoint</dt><dd>{{endpoint}}</dd></div>
  <div><dt>Model</dt><dd>{{model}}</dd></div>
  <div><dt>Submitted</dt><dd>{{submitted}}</dd></div>
  <div><dt>Last change</dt><dd>{{changed}}</dd></div>
  <div><dt>Attempts</dt><dd>{{attempts}}</dd></div>
</dl>
% if cancellable:
<form method="post" action="/dashboard/requests/{{id}}/cancel">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <button type="submit" class="danger">Cancel this request</button>
</form>
% end
<section aria-labelledby="messages-h">
  <h2 id="messages-h">Request</h2>
  % for m in messages:
  <div class="message"><span class="role">{{m['role']}}</span><pre>{{m['content']}}</pre></div>
  % end
  % if input:
  <pre>{{input}}</pre>
  % end
</section>
% if answers:
<section aria-labelledby="response-h">
  <h2 id="response-h">Response</h2>
  % for a in answers:
  <div class="message answer"><span class="role">{{a['role']}}</span><pre>{{a['content']}}</pre></div>
  % end
  % if usage:
  <p class="hint">Usage: <code>{{usage}}</code></p>
  % end
</section>
% end
% if error:
<section aria-labelledby="error-h">
  <h2 id="error-h">Error</h2>
  <dl class="facts error">
  % for key, value in error.items():
    <div><dt>{{key}}</dt><dd>{{value}}</dd></div>
  % end
  </dl>
</section>
% end
<section aria-labelledby="attempts-h">
  <h2 id="attempts-h">Attempts</h2>
  % if history:
  <div class="scroll"><table>
    <thead><tr><th scope="col">#</th><th scope="col">Started</th><th scope="col">Duration</th><th scope="col">Outcome</th></tr></thead>
    <tbody>
    % for h in history:
    <tr><td class="num">{{h['number']}}</td><td class="when">{{h['started']}}</td><td class="num">{{h['duration']}}</td><td>{{h['outcome']}}</td></tr>
    % end
    </tbody>
  </table></div>
  % else:
  <p class="empty">No attempt recorded yet.</p>
  % end
</section>
<section aria-labelledby="webhook-h">
  <h2 id="webhook-h">Webhook</h2>
  % if webhook:
  <dl class="facts">
    <div><dt>URL</dt><dd class="id">{{webhook['url']}}</dd></div>
    <div><dt>State</dt><dd>{{webhook['state']}}</dd></div>
    <div><dt>Deliveries tried</dt><dd>{{webhook['attempts']}}</dd></div>
    % if webhook['last_status']:
    <div><dt>Last HTTP status</dt><dd>{{webhook['last_status']}}</dd></div>
    % end
    % if webhook['last_error']:
    <div><dt>Last error</dt><dd>{{webhook['last_error']}}</dd></div>
    % end
    % if webhook['next_attempt']:
    <div><dt>Next try</dt><dd>{{webhook['next_attempt']}}</dd></div>
    % end
  </dl>
  % else:
  <p class="empty">No webhook for this request.</p>
  % end
</section>
