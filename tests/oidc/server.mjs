// Starts oauth2-mock-server, an OIDC provider written by others, on a free loopback port.
// POST /token with grant_type=client_credentials&pg_user=alice&pg_groups=a,b returns an
// access token whose preferred_username and groups claims pgproxy maps to a role.
import { OAuth2Server } from 'oauth2-mock-server';

const server = new OAuth2Server();
await server.issuer.keys.generate('RS256');
server.service.on('beforeTokenSigning', (token, req) => {
  token.payload.aud = req.body.audience || 'pgproxy';
  token.payload.preferred_username = req.body.pg_user;
  token.payload.groups = (req.body.pg_groups || '').split(',').filter(Boolean);
});
await server.start(0, '127.0.0.1');
console.log(JSON.stringify({ issuer: server.issuer.url }));
process.on('SIGTERM', async () => { await server.stop(); process.exit(0); });
