package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/metadata"

	"github.com/meshid/meshid/ca/jwtsvid/jwtsvidpb"
)

// JWTSVID is a JWT-SVID as the CA returned it.
type JWTSVID struct {
	Token    string
	ID       spiffeid.ID
	Audience []string
	IssuedAt time.Time
	Expiry   time.Time
}

// JWTMinter asks the CA for JWT-SVIDs; *CAClient is one.
type JWTMinter interface {
	MintJWT(ctx context.Context, token string, audience []string) (*JWTSVID, error)
}

// MintJWT asks meshid-ca for a JWT-SVID for audience, proving the identity
// with token as Sign does.
func (c *CAClient) MintJWT(ctx context.Context, token string, audience []string) (*JWTSVID, error) {
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token, "clusterid", c.clusterID)
	resp, err := c.jwt.MintJWTSVID(ctx, &jwtsvidpb.MintJWTSVIDRequest{Audience: audience})
	if err != nil {
		return nil, err
	}
	id, err := spiffeid.FromString(resp.GetSpiffeId())
	if err != nil {
		return nil, fmt.Errorf("agent: the CA's JWT-SVID names no valid SPIFFE ID: %w", err)
	}
	return &JWTSVID{
		Token:    resp.GetToken(),
		ID:       id,
		Audience: slices.Clone(audience),
		IssuedAt: time.Unix(resp.GetIssuedAt(), 0),
		Expiry:   time.Unix(resp.GetExpiresAt(), 0),
	}, nil
}

// maxJWTCache bounds the JWT-SVIDs the agent keeps: one per identity and
// audience set asked for, and a workload asks for a few.
const maxJWTCache = 4096

// ErrNoJWT says the agent was set up without a CA to mint JWT-SVIDs.
var ErrNoJWT = errors.New("agent: JWT-SVIDs are not configured")

// jwtCache holds the JWT-SVIDs minted, by identity and audience set, for
// as long as they are worth handing out again. It outlives handles: a
// workload in node mode holds its identity only for the call.
type jwtCache struct {
	mu    sync.Mutex
	svids map[string]*JWTSVID
}

func (c *jwtCache) get(key string, now time.Time) *JWTSVID {
	c.mu.Lock()
	defer c.mu.Unlock()
	s, ok := c.svids[key]
	if !ok || !now.Before(s.IssuedAt.Add(s.Expiry.Sub(s.IssuedAt)/2)) {
		return nil
	}
	return s
}

func (c *jwtCache) put(key string, s *JWTSVID, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.svids == nil {
		c.svids = map[string]*JWTSVID{}
	}
	if len(c.svids) >= maxJWTCache {
		for k, old := range c.svids {
			if !now.Before(old.Expiry) {
				delete(c.svids, k)
			}
		}
		if len(c.svids) >= maxJWTCache {
			clear(c.svids)
		}
	}
	c.svids[key] = s
}

// JWTSVID returns a JWT-SVID of the handle's identity for audience: one
// held for that audience while more than half its life is left, else a new
// one from the CA, asked with this holder's token (the caller's own proof
// of the identity).
func (h *Handle) JWTSVID(ctx context.Context, audience []string) (*JWTSVID, error) {
	e := h.e
	m := e.m
	if m.cfg.JWT == nil {
		return nil, ErrNoJWT
	}
	key := e.id.String() + "\x00" + jwtCacheKey(audience)
	now := m.cfg.Now()
	if s := m.jwts.get(key, now); s != nil {
		return s, nil
	}
	if !h.until.IsZero() && !now.Before(h.until) {
		return nil, errors.New("agent: the caller's token has expired")
	}
	e.mu.Lock()
	tokens := h.tokens
	e.mu.Unlock()
	token, err := tokens.Token()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, m.cfg.RequestTimeout)
	defer cancel()
	s, err := m.cfg.JWT.MintJWT(ctx, token, audience)
	if err != nil {
		return nil, fmt.Errorf("agent: CA refused or failed: %w", err)
	}
	if s.ID != e.id {
		return nil, fmt.Errorf("agent: the CA minted a JWT-SVID for %s, not %s", s.ID, e.id)
	}
	m.jwts.put(key, s, now)
	return s, nil
}

// jwtCacheKey is the same for the same set of audiences in any order.
func jwtCacheKey(audience []string) string {
	a := slices.Clone(audience)
	slices.Sort(a)
	return strings.Join(slices.Compact(a), "\x00")
}
