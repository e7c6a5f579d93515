"""`nas export --hf`: a trained run as a Hugging Face model folder, its code generated from
nas.model."""
