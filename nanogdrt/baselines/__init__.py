"""The paper's baselines (Tables 2 and 3), beside the core: each is a loss or a decoding score
that plugs into the core's functions. The core never imports this package."""
