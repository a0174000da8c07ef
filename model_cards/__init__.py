"""Card templates of hf-moso, installed as the `hf_moso.model_cards` package."""
