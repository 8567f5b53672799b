"""Numbers more than one implementation must agree on."""

# SparseLSR's constant guarding log(0) when p_y rounds to 1 (equation 15 of Raymond et al., 2023).
PAPER_EPS = 1e-7
