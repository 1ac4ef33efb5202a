package ledger

import (
	"context"
	"database/sql"
	"errors"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Filter selects certificates. Zero fields do not filter.
type Filter struct {
	SPIFFEID       string
	Namespace      string
	PodName        string
	Serial         string
	IssuedSince    time.Time
	ExpiringWithin time.Duration // > 0: only certificates still valid at Now whose NotAfter <= Now+ExpiringWithin
	ValidOnly      bool          // only certificates valid at Now
	Now            time.Time     // required when ExpiringWithin or ValidOnly is set
	Limit          int           // page size: default 100, at most 1000
	PageToken      string        // from Page.Next; opaque
}

// Page is one page of certificates, newest issued first (then serial), and
// the token of the next page ("" at the end).
type Page struct {
	Records []Record
	Next    string
}

const (
	defaultLimit = 100
	maxLimit     = 1000
)

// where turns f into SQL conditions and their arguments, and the page size.
func (l *Ledger) where(f Filter) (conds []string, args []any, limit int, err error) {
	limit = f.Limit
	switch {
	case limit < 0:
		return nil, nil, 0, errorf("filter: Limit %d is negative", limit)
	case limit == 0:
		limit = defaultLimit
	case limit > maxLimit:
		return nil, nil, 0, errorf("filter: Limit %d is above %d", limit, maxLimit)
	}
	if f.ExpiringWithin < 0 {
		return nil, nil, 0, errorf("filter: ExpiringWithin %s is negative", f.ExpiringWithin)
	}
	if (f.ValidOnly || f.ExpiringWithin > 0) && f.Now.IsZero() {
		return nil, nil, 0, errorf("filter: ValidOnly and ExpiringWithin need Now")
	}
	add := func(cond string, a ...any) {
		conds = append(conds, cond)
		args = append(args, a...)
	}
	if f.SPIFFEID != "" {
		add("spiffe_id = ?", f.SPIFFEID)
	}
	if f.Namespace != "" {
		add("namespace = ?", f.Namespace)
	}
	if f.PodName != "" {
		add("pod_name = ?", f.PodName)
	}
	if f.Serial != "" {
		if err := checkSerial(f.Serial); err != nil {
			return nil, nil, 0, errorf("filter: %v", err)
		}
		add("serial = ?", f.Serial)
	}
	if !f.IssuedSince.IsZero() {
		add("issued_at >= ?", l.d.timeArg(f.IssuedSince))
	}
	if f.ValidOnly || f.ExpiringWithin > 0 {
		add("not_before <= ?", l.d.timeArg(f.Now))
		add("not_after > ?", l.d.timeArg(f.Now))
	}
	if f.ExpiringWithin > 0 {
		add("not_after <= ?", l.d.timeArg(f.Now.Add(f.ExpiringWithin)))
	}
	if f.PageToken != "" {
		c, err := decodeToken(f.PageToken)
		if err != nil {
			return nil, nil, 0, err
		}
		// A row value: both databases read it off the (…, issued_at,
		// serial) indexes as one range.
		add("(issued_at, serial) < (?, ?)", l.d.timeArg(c.issuedAt), c.serial)
	}
	return conds, args, limit, nil
}

// Certificates returns the page of certificates f selects. A bad filter
// (Limit above 1000, a token this ledger did not make, ValidOnly or
// ExpiringWithin without Now) is refused with an error that does not wrap
// ErrUnavailable.
func (l *Ledger) Certificates(ctx context.Context, f Filter) (Page, error) {
	conds, args, limit, err := l.where(f)
	if err != nil {
		return Page{}, err
	}
	// One read transaction, so that a move from recent to certificates is
	// seen whole or not at all.
	tx, err := l.r.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return Page{}, unavailable(err)
	}
	defer tx.Rollback()
	var recs []Record
	for _, table := range l.tables() {
		q := "SELECT " + certColumns + " FROM " + table
		if len(conds) > 0 {
			q += " WHERE " + strings.Join(conds, " AND ")
		}
		// One row more than the page tells whether there is a next page.
		q += " ORDER BY issued_at DESC, serial DESC LIMIT " + strconv.Itoa(limit+1)
		got, err := queryRecords(ctx, tx, l.d.rebind(q), args...)
		if err != nil {
			return Page{}, err
		}
		recs = append(recs, got...)
	}
	slices.SortFunc(recs, func(a, b Record) int {
		if c := b.IssuedAt.Compare(a.IssuedAt); c != 0 {
			return c
		}
		return strings.Compare(b.Serial, a.Serial)
	})
	p := Page{Records: recs}
	if len(p.Records) > limit {
		p.Records = p.Records[:limit]
		last := p.Records[limit-1]
		p.Next = encodeToken(cursor{issuedAt: last.IssuedAt, serial: last.Serial})
	}
	return p, nil
}

// tables are where certificate records live: the indexed table, and for
// SQLite the small unindexed one new records go to first.
func (l *Ledger) tables() []string {
	if t := l.newTable(); t != "certificates" {
		return []string{"certificates", t}
	}
	return []string{"certificates"}
}

// unionAll is q, a query of one table named {table}, over every table
// records live in, with args repeated for each.
func (l *Ledger) unionAll(q string, args ...any) (string, []any) {
	var parts []string
	var all []any
	for _, t := range l.tables() {
		parts = append(parts, strings.ReplaceAll(q, "{table}", t))
		all = append(all, args...)
	}
	return strings.Join(parts, " UNION ALL "), all
}

type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

func queryRecords(ctx context.Context, q querier, query string, args ...any) ([]Record, error) {
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, unavailable(err)
	}
	defer rows.Close()
	var recs []Record
	for rows.Next() {
		r, err := scanRecord(rows)
		if err != nil {
			return nil, unavailable(err)
		}
		recs = append(recs, r)
	}
	if err := rows.Err(); err != nil {
		return nil, unavailable(err)
	}
	return recs, nil
}

// Certificate returns the record of one serial, or ErrNotFound.
func (l *Ledger) Certificate(ctx context.Context, serial string) (Record, error) {
	if err := checkSerial(serial); err != nil {
		return Record{}, errorf("certificate: %v", err)
	}
	q, args := l.unionAll("SELECT "+certColumns+" FROM {table} WHERE serial = ?", serial)
	row := l.r.QueryRowContext(ctx, l.d.rebind(q), args...)
	r, err := scanRecord(row)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return Record{}, ErrNotFound
	case err != nil:
		return Record{}, unavailable(err)
	}
	return r, nil
}

// Identities summarises every identity in namespace ("" for all) at now,
// sorted by SPIFFE ID, including denied identities that have no
// certificate. It reads the identities table and the certificates still
// valid at now, never the expired ones.
func (l *Ledger) Identities(ctx context.Context, namespace string, now time.Time) ([]Identity, error) {
	if now.IsZero() {
		return nil, errorf("identities: now is not set")
	}
	valid := "not_after > ? AND not_before <= ?"
	validArgs := []any{l.d.timeArg(now), l.d.timeArg(now)}
	nsCond := ""
	if namespace != "" {
		valid += " AND namespace = ?"
		validArgs = append(validArgs, namespace)
		nsCond = " WHERE i.namespace = ?"
	}
	validRows, args := l.unionAll("SELECT spiffe_id, not_after FROM {table} WHERE "+valid, validArgs...)
	// The table's last_issued may lag by up to identityRefresh; the
	// newest certificate (one index seek per identity) has the exact time
	// while it is kept.
	last := "COALESCE((SELECT MAX(c.issued_at) FROM certificates c WHERE c.spiffe_id = i.spiffe_id), i.last_issued)"
	recentJoin := ""
	if t := l.newTable(); t != "certificates" {
		// Records not yet moved out of the small unindexed table: grouped
		// once, not scanned per identity.
		last = l.d.greatest + "(" + last + ", COALESCE(rl.last, i.last_issued))"
		recentJoin = " LEFT JOIN (SELECT spiffe_id, MAX(issued_at) AS last FROM " + t + " GROUP BY spiffe_id) rl ON rl.spiffe_id = i.spiffe_id"
	}
	if namespace != "" {
		args = append(args, namespace)
	}
	q := `SELECT i.spiffe_id, i.namespace, i.service_account,
		` + l.d.greatest + `(i.last_issued, ` + last + `),
		COALESCE(v.n, 0), v.soonest
		FROM identities i
		LEFT JOIN (
			SELECT spiffe_id, COUNT(*) AS n, MIN(not_after) AS soonest FROM (` + validRows + `) u
			GROUP BY spiffe_id
		) v ON v.spiffe_id = i.spiffe_id` + recentJoin + nsCond + `
		ORDER BY i.spiffe_id`
	rows, err := l.r.QueryContext(ctx, l.d.rebind(q), args...)
	if err != nil {
		return nil, unavailable(err)
	}
	defer rows.Close()
	var ids []Identity
	for rows.Next() {
		var id Identity
		if err := rows.Scan(&id.SPIFFEID, &id.Namespace, &id.ServiceAccount, timeCol{&id.LastIssued}, &id.ValidCerts, timeCol{&id.SoonestExpiry}); err != nil {
			return nil, unavailable(err)
		}
		ids = append(ids, id)
	}
	if err := rows.Err(); err != nil {
		return nil, unavailable(err)
	}
	denials, err := l.Denials(ctx)
	if err != nil {
		return nil, err
	}
	// Denials are few: join them here, so that identities never issued a
	// certificate are listed too.
	known := make(map[string]int, len(ids))
	for i := range ids {
		known[ids[i].SPIFFEID] = i
	}
	for _, d := range denials {
		if i, ok := known[d.SPIFFEID]; ok {
			ids[i].Denial = &d
			continue
		}
		ns, sa := workload(d.SPIFFEID)
		if namespace != "" && ns != namespace {
			continue
		}
		ids = append(ids, Identity{SPIFFEID: d.SPIFFEID, Namespace: ns, ServiceAccount: sa, Denial: &d})
	}
	slices.SortFunc(ids, func(a, b Identity) int { return strings.Compare(a.SPIFFEID, b.SPIFFEID) })
	return ids, nil
}

// workload reads namespace and service account from a SPIFFE ID of the form
// spiffe://<td>/ns/<ns>/sa/<sa>; "" for other forms.
func workload(id string) (ns, sa string) {
	parsed, err := spiffeid.FromString(id)
	if err != nil {
		return "", ""
	}
	seg := strings.Split(strings.TrimPrefix(parsed.Path(), "/"), "/")
	if len(seg) != 4 || seg[0] != "ns" || seg[2] != "sa" {
		return "", ""
	}
	return seg[1], seg[3]
}

// Outstanding counts the certificates valid at now that were issued before
// cutoff, and when the last of them lapses (zero when none). A root
// rotation waits on it: until it is zero, some workload may still present
// a certificate from before a stage, or hold only the bundle of then.
func (l *Ledger) Outstanding(ctx context.Context, cutoff, now time.Time) (n int, lastExpiry time.Time, err error) {
	if cutoff.IsZero() || now.IsZero() {
		return 0, time.Time{}, errorf("outstanding: cutoff and now must be set")
	}
	// not_after is indexed; certificates valid now are the few.
	valid, args := l.unionAll("SELECT not_after FROM {table} WHERE not_after > ? AND issued_at < ?", l.d.timeArg(now), l.d.timeArg(cutoff))
	row := l.r.QueryRowContext(ctx, l.d.rebind("SELECT COUNT(*), MAX(not_after) FROM ("+valid+") u"), args...)
	if err := row.Scan(&n, timeCol{&lastExpiry}); err != nil {
		return 0, time.Time{}, unavailable(err)
	}
	return n, lastExpiry, nil
}
