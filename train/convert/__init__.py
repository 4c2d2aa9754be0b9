"""Foreign weight formats, one module each, both directions: Hugging Face (`hf.py`) and EasyLM (`easylm.py`)."""
