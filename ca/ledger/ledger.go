package ledger

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Record is one issued certificate. It never holds key material.
type Record struct {
	Serial            string // lower-case hex of the serial number, as fmt.Sprintf("%x", serial)
	SPIFFEID          string
	Namespace         string
	ServiceAccount    string
	PodName           string // "" when the token was not bound to a pod
	PodUID            string
	ClusterID         string // the cluster that verified the token (meshid-ca's --cluster-id for its own); before schema 3, as the caller claimed it
	PublicKeySHA256   string // lower-case hex SHA-256 of the leaf's SubjectPublicKeyInfo DER
	NotBefore         time.Time
	NotAfter          time.Time
	IssuerFingerprint string // lower-case hex SHA-256 of the issuing CA certificate's DER
	AuthMethod        string // "offline", "tokenreview" or "jwks"
	IssuedAt          time.Time
	// RequestedBy is the SPIFFE ID of the caller when it is not the
	// identity's own: a node proxy (Istio ambient's ztunnel) asking for a
	// workload on its node, which then holds the key. PodName and PodUID
	// are then the node proxy's pod. "" when the holder asked itself.
	RequestedBy string
}

// Denial cuts an identity off: no more issuance or renewal.
type Denial struct {
	SPIFFEID string
	Reason   string
	By       string // who denied it (the admin's identity)
	At       time.Time
}

// Identity summarises one SPIFFE ID.
type Identity struct {
	SPIFFEID       string
	Namespace      string
	ServiceAccount string
	ValidCerts     int       // certificates with NotBefore <= now < NotAfter
	LastIssued     time.Time // zero if none recorded
	SoonestExpiry  time.Time // smallest NotAfter among the valid ones; zero if none
	Denial         *Denial   // nil unless denied
}

// Config opens a ledger.
type Config struct {
	Driver string // "sqlite" or "postgres"
	// DSN: for sqlite a file path (the CA uses <state-dir>/ledger.db); for
	// postgres a libpq/pgx URL or key=value DSN.
	DSN string
	// MaxBatch bounds how many records one commit carries (default 256).
	MaxBatch int
	// CommitDelay: under load (the last commit carried two records or
	// more), a commit of fewer than 32 records waits until its first
	// record has waited this long, so that more share it. 0 means
	// DefaultCommitDelay; negative, never.
	CommitDelay time.Duration
	Log         *slog.Logger // nil: discard
}

// ErrNotFound is returned when the certificate asked for is not recorded.
var ErrNotFound = errors.New("ledger: not found")

// ErrUnavailable wraps every failure to write or read the database (so
// callers can map it to gRPC Unavailable). Refusals of bad input never wrap
// it.
var ErrUnavailable = errors.New("ledger: unavailable")

const defaultMaxBatch = 256

// DefaultCommitDelay is how long, under load, a small commit waits for more
// records after its first one arrived. Measured at 64 requests in flight on
// 2 cores (hack/perf-ledger.sh): SQLite 0.52x of no ledger without it
// (1.3 records a commit), 0.70x at 1-2 ms, 0.79x at 4 ms, 0.71x at 8 ms.
const DefaultCommitDelay = 4 * time.Millisecond

// commitTimeout bounds one group commit. It does not come from any caller's
// context: one impatient caller must not fail the records of the others.
const commitTimeout = 30 * time.Second

// Ledger records certificates in SQLite or PostgreSQL. Its methods are safe
// for concurrent use.
type Ledger struct {
	d        *dialect
	w        *sql.DB // writes; a single connection for SQLite
	r        *sql.DB // reads; the same pool as w for PostgreSQL
	log      *slog.Logger
	maxBatch int
	stmts    stmtCache      // the commit loop's own
	texts    map[int]string // likewise: statement texts by rows (negative: certificates)

	mu        sync.Mutex
	cond      *sync.Cond // signalled when queue grows or closed is set
	queue     []*pending
	lastBatch int // records in the last commit; only next reads and writes it
	closed    bool

	commitDelay time.Duration
	loopDone    chan struct{}

	ids identityCache // identities the commit loop wrote lately

	hot      int       // records put in recent since the last move; under mu
	lastMove time.Time // under mu

	commits atomic.Int64
	records atomic.Int64
}

// Stats counts the group commits of a ledger since Open.
type Stats struct {
	Commits int64 // transactions that committed records
	Records int64 // records they carried
}

// Open connects to the database, applies the schema migrations it lacks, and
// starts the commit loop. It fails if the database's schema is newer than
// this code.
func Open(ctx context.Context, cfg Config) (*Ledger, error) {
	if cfg.MaxBatch < 0 {
		return nil, errorf("MaxBatch %d is negative", cfg.MaxBatch)
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var (
		d    *dialect
		w, r *sql.DB
		err  error
	)
	switch cfg.Driver {
	case "sqlite":
		d = sqliteDialect
		w, r, err = openSQLite(ctx, cfg.DSN, log)
	case "postgres":
		d = postgresDialect
		w, err = openPostgres(ctx, cfg.DSN, log)
		r = w
	default:
		return nil, errorf("unknown driver %q (want sqlite or postgres)", cfg.Driver)
	}
	if err != nil {
		return nil, err
	}
	l := &Ledger{d: d, w: w, r: r, log: log, maxBatch: cfg.MaxBatch, stmts: stmtCache{}, texts: map[int]string{}, loopDone: make(chan struct{}), commitDelay: cfg.CommitDelay}
	if l.maxBatch == 0 {
		l.maxBatch = defaultMaxBatch
	}
	if l.commitDelay == 0 {
		l.commitDelay = DefaultCommitDelay
	}
	if err := migrate(ctx, d, w, log); err != nil {
		l.closeDB()
		return nil, err
	}
	if d == sqliteDialect {
		// Gathers the query planner's statistics where they are missing or
		// stale, as SQLite advises when opening a long-lived connection;
		// Close runs it again.
		if _, err := w.ExecContext(ctx, "PRAGMA optimize=0x10002"); err != nil {
			log.Warn("ledger: PRAGMA optimize failed", "error", err)
		}
	}
	l.cond = sync.NewCond(&l.mu)
	go l.commitLoop()
	return l, nil
}

// Ping checks that the database answers and holds a ledger.
func (l *Ledger) Ping(ctx context.Context) error {
	var v int
	if err := l.r.QueryRowContext(ctx, "SELECT MAX(version) FROM schema_migrations").Scan(&v); err != nil {
		return unavailable(err)
	}
	return nil
}

// Stats reports the commits since Open.
func (l *Ledger) Stats() Stats {
	return Stats{Commits: l.commits.Load(), Records: l.records.Load()}
}

// Close commits what is queued, stops the commit loop and closes the
// database. Record fails after Close. Closing twice is harmless.
func (l *Ledger) Close() error {
	l.mu.Lock()
	already := l.closed
	l.closed = true
	l.mu.Unlock()
	l.cond.Broadcast()
	<-l.loopDone
	if already {
		return nil
	}
	for _, st := range l.stmts { // the loop has ended: nothing else uses them
		st.Close()
	}
	if l.d == sqliteDialect {
		// Keeps the query planner's statistics fresh, as SQLite advises
		// before closing a long-lived connection; cheap when nothing changed.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if _, err := l.w.ExecContext(ctx, "PRAGMA optimize"); err != nil {
			l.log.Warn("ledger: PRAGMA optimize failed", "error", err)
		}
		cancel()
	}
	return l.closeDB()
}

func (l *Ledger) closeDB() error {
	err := l.w.Close()
	if l.r != l.w {
		err = errors.Join(err, l.r.Close())
	}
	if err != nil {
		return fmt.Errorf("ledger: closing: %w", err)
	}
	return nil
}

// unavailable marks a database failure.
func unavailable(err error) error {
	return fmt.Errorf("%w: %w", ErrUnavailable, err)
}

// errorf formats a refusal of bad input (never ErrUnavailable).
func errorf(format string, args ...any) error {
	return fmt.Errorf("ledger: "+format, args...)
}
