% rebase('layout', title=title, session=session, csrf=csrf, poll=0)
<h1>Requests</h1>
<div class="filters">
  <form method="get" action="/dashboard/requests" class="inline">
    <label for="status">Status</label>
    <select id="status" name="status">
      <option value="">any</option>
      % for s in statuses:
      <option value="{{s}}"{{!' selected' if s == status_filter else ''}}>{{s}}</option>
      % end
    </select>
    <label for="endpoint">Endpoint</label>
    <select id="endpoint" name="endpoint">
      <option value="">any</option>
      % for e in endpoints:
      <option value="{{e}}"{{!' selected' if e == endpoint_filter else ''}}>{{e}}</option>
      % end
    </select>
    <button type="submit">Filter</button>
  </form>
  <form method="get" action="/dashboard/requests" class="inline" role="search">
    <label for="find">Find by id</label>
    <input id="find" name="id" type="search" placeholder="chatreq_…" autocomplete="off" spellcheck="false">
    <button type="submit">Open</button>
  </form>
</div>
% include('rows', rows=rows, caption='Your requests, newest first')
<nav class="pages" aria-label="Pages">
  % if paged:
  <a href="{{newest}}">Newest</a>
  % end
  % if older:
  <a href="{{older}}">Older</a>
  % end
</nav>
