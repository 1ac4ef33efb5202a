// Package agent is the workload side of meshid: it makes keys on the node,
// asks meshid-ca for certificates with the workload's token, and keeps them
// fresh.
package agent
