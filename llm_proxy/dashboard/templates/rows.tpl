<div class="scroll">
<table class="requests">
  <caption class="visually-hidden">{{caption}}</caption>
  <thead><tr>
    <th scope="col">Request</th><th scope="col">Status</th><th scope="col">Endpoint</th>
    <th scope="col">Model</th>
    <th scope="col">Submitted</th><th scope="col">Duration</th><th scope="col">Attempts</th>
    <th scope="col">Error</th>
  </tr></thead>
  <tbody data-rows>
  % for r in rows:
  <tr>
    <td class="id"><a href="/dashboard/requests/{{r['id']}}">{{r['id']}}</a></td>
    <td><span class="badge {{r['status']}}">{{r['status']}}</span></td>
    <td>{{r['endpoint']}}</td>
    <td>{{r['model']}}</td>
    <td class="when">{{r['submitted']}}</td>
    <td class="num">{{r['duration']}}</td>
    <td class="num">{{r['attempts']}}</td>
    <td>{{r['error_type']}}</td>
  </tr>
  % end
  </tbody>
</table>
</div>
% if not rows:
<p class="empty" data-empty>No requests.</p>
% end
