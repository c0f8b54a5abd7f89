"""`ferray report`: the paper reproduced from one plan file (plan -> build -> document -> render)."""
