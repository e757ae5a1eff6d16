% rebase('layout', title=title, session=None, csrf='', poll=0)
<section class="card narrow">
  <h1>Sign in</h1>
  <p>Sign in with one of the service's API keys. You will see the requests sent with that key.</p>
  % if failed:
  <p class="alert" role="alert">
    % if get('wait', 0):
    Too many failed sign-ins from your address: try again in {{wait}} s.
    % else:
    Sign-in failed.
    % end
  </p>
  % end
  <form method="post" action="/dashboard/sign-in">
    <label for="api_key">API key</label>
    <input id="api_key" name="api_key" type="password" autocomplete="current-password" required autofocus>
    <button type="submit">Sign in</button>
  </form>
</section>
