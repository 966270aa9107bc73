// The test OpenID provider of the Molecule scenarios: npm's certified oidc-provider library, with one
// confidential client and the users of USERS_FILE. Everything comes from the environment
// (oidc-test-provider-start.yml writes it from the scenario's inventory): ISSUER, PORT, CLIENT_ID,
// CLIENT_SECRET, REDIRECT_URIS (comma-separated), COOKIE_KEY, USERS_FILE (a JSON list of
// {login, email, name, groups}).
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const env = (name) => {
  if (!process.env[name]) throw new Error(`${name} is not set`);
  return process.env[name];
};
const USERS = Object.fromEntries(JSON.parse(readFileSync(env('USERS_FILE'), 'utf8')).map((u) => [u.login, u]));

const provider = new Provider(env('ISSUER'), {
  clients: [{
    client_id: env('CLIENT_ID'),
    client_secret: env('CLIENT_SECRET'),
    redirect_uris: env('REDIRECT_URIS').split(','),
    response_types: ['code'],
    grant_types: ['authorization_code'],
  }],
  // Scope -> the claims it releases; `groups` becomes a scope of its own, as Keycloak's client scope.
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  // By default the ID token of the code flow carries only `sub`; the relying party reads the groups
  // from the ID token, as Entra ID, Okta and Keycloak (with their mappers) put them there.
  conformIdTokenClaims: false,
  async findAccount(ctx, id) {
    const user = USERS[id];
    if (!user) return undefined; // no account for a login that is not in the file
    return {
      accountId: id,
      async claims() {
        return { sub: id, preferred_username: id, email: user.email, email_verified: true, name: user.name, groups: user.groups };
      },
    };
  },
  // A first-party client: every requested scope is granted, with no consent page (the library's
  // "skip consent" recipe).
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope(ctx.oidc.requestParamScopes ? [...ctx.oidc.requestParamScopes].join(' ') : 'openid');
    await grant.save();
    return grant;
  },
  cookies: { keys: [env('COOKIE_KEY')] },
  // The library's own login form at /interaction/:uid (it checks no password).
  features: { devInteractions: { enabled: true } },
});
provider.proxy = true;
provider.listen(Number(env('PORT')), () => console.log(`oidc-provider ${env('ISSUER')} listening`));
