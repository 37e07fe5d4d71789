// A real OpenID Connect provider for tests/signaling/test_oidc.py: the certified
// `oidc-provider` package from npm (package-lock.json pins it), never an imitation of one.
//
// It listens on 127.0.0.1 and an ephemeral port and prints {"issuer": ...} on stdout; the test
// then starts the server with that issuer, learns the server's own port, and writes one JSON
// line on stdin: {"clients": [...], "accounts": {accountId: claims}}. Only then is the
// provider built (a client's redirect URI names the server's port) and {"ready": true}
// printed. Closing stdin stops it.
//
// The sign-in itself is oidc-provider's devInteractions: a login form that accepts any login
// as the account id (the test plays the hospital's user) and a consent form, both plain HTML
// forms the test submits with HTTP requests.
import http from 'node:http';
import readline from 'node:readline';

import Provider from 'oidc-provider';

const server = http.createServer();

server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  // ISSUER_HOST=localhost: another site than the server's 127.0.0.1, as a hospital's
  // identity provider is (the browser test needs the cross-site redirects).
  const issuer = `http://${process.env.ISSUER_HOST ?? '127.0.0.1'}:${port}`;
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
  const lines = readline.createInterface({ input: process.stdin });
  lines.once('line', (line) => {
    const setup = JSON.parse(line);
    const provider = new Provider(issuer, {
      clients: setup.clients,
      // Every login is an account; its claims are the test's (none: only `sub`).
      async findAccount(ctx, id) {
        return {
          accountId: id,
          async claims() { return { sub: id, ...(setup.accounts[id] ?? {}) }; },
        };
      },
      claims: {
        openid: ['sub'],
        profile: ['name', 'preferred_username'],
        clinician: ['clinician_id'],
      },
      pkce: { required: () => true },
      cookies: { keys: ['oidc-provider test cookie key'] },
      features: { devInteractions: { enabled: true } },
      ttl: { Interaction: 300, Session: 600, Grant: 600, AuthorizationCode: 60 },
    });
    provider.on('server_error', (ctx, error) => {
      process.stderr.write(`oidc-provider server_error: ${error}\n`);
    });
    server.on('request', provider.callback());
    process.stdout.write(`${JSON.stringify({ ready: true })}\n`);
  });
  lines.on('close', () => {
    server.close();
    process.exit(0);
  });
});
