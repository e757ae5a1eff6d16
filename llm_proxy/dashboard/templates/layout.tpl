<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}} · LLM Proxy</title>
<link rel="stylesheet" href="/dashboard/static/dashboard.css">
% if poll:
<script src="/dashboard/static/dashboard.js" defer></script>
% end
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
<header class="top">
  <span class="brand">LLM Proxy</span>
  % if session:
  <nav aria-label="Dashboard">
    <a href="/dashboard"{{!' aria-current="page"' if title == 'Overview' else ''}}>Overview</a>
    <a href="/dashboard/requests"{{!' aria-current="page"' if title == 'Requests' else ''}}>Requests</a>
  </nav>
  <form class="signout" method="post" action="/dashboard/sign-out">
    <input type="hidden" name="csrf" value="{{csrf}}">
    <button type="submit">Sign out</button>
  </form>
  % end
</header>
<main id="main" tabindex="-1"{{!' data-poll="%d"' % poll if poll else ''}}>
{{!base}}
</main>
</body>
</html>
