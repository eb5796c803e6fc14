"""Run configurations: the setups' JSON files, overrides and checks (``load``) and where each
value comes from, the paper or the authors' released code (``provenance``)."""
