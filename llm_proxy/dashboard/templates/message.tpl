% rebase('layout', title=title, session=get('session'), csrf=get('csrf', ''), poll=0)
<section class="card narrow">
  <h1>{{title}}</h1>
  <p>{{message}}</p>
  <p><a href="/dashboard">Back to the overview</a></p>
</section>
