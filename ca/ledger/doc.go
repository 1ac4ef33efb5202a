// Package ledger is the durable record of every certificate meshid-ca
// issues, of the identities they were issued to, and of the identities an
// admin has cut off.
//
// Two databases sit behind one implementation: SQLite (embedded, the default:
// one file in the CA's state directory) and PostgreSQL (shared, so that CA
// replicas see one ledger). Both go through database/sql; what differs
// between them — placeholders, column types, a few functions — is kept in
// dialect.go.
//
// The CA hands a certificate to a client only after [Ledger.Record] has
// returned, so a record must survive a crash: SQLite runs with
// synchronous=FULL, PostgreSQL with synchronous_commit=on. To keep that
// affordable under load, records are group-committed: one goroutine commits
// whatever queued while the previous commit ran, in one transaction, and
// wakes every waiter with the result.
//
// Records hold no secrets (serials, names, hashes and times), and only the
// serial and SPIFFE ID of a record are ever logged.
package ledger
