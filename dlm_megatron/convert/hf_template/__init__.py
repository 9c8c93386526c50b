"""Modeling code copied next to exported Hugging Face weights (see convert/hf.py); a package only so that installs ship it."""
