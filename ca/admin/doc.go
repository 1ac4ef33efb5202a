// Package admin serves meshid-ca's admin API (adminpb.Admin): listing the
// identities and certificates the ledger holds, denying and allowing
// identities, the trust bundle and the CA's status. Only callers with an
// admin client certificate (a SPIFFE ID on the admin list, chained to the
// CA's roots) or an admin service account's token get in; every call is
// logged with who made it.
package admin
