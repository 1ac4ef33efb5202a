// Package chart renders meshid's Helm chart (deploy/charts/meshid) with
// Helm's Go SDK, as helm install does but without a cluster, and writes the
// kustomize base (deploy/base) from the chart's default render, so that the
// two never describe different objects.
package chart
