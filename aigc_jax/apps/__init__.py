"""Applications built on trained runs: batch classification and opinion monitoring."""
