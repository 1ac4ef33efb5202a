// Package rotation replaces a CA's root without an outage, in stored
// stages: prepare (a new root and intermediate, trusted by no one), distribute
// (the new root joins every trust bundle), switch (the new intermediate
// signs) and retire (the old root leaves the bundles). Each stage is checked
// before it is taken, against the ledger, the bundle ConfigMaps and time for
// replicas and kubelets to catch up, and each is one write to the CA's store,
// so a CA that stops anywhere resumes where it was.
package rotation
