"""Make the mirror true: sync one scope, reconcile a seat list, the full resync, the drift check."""
