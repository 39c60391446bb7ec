"""Tools to look at what the latents of a trained run mean: their top contexts and numbers (features),
a browsable page of them (page, with page.js and page.css), and an LLM judge of their coherence (judge).

    python -m latents.features RUN_DIR      # RUN_DIR/features.json and features.html
    python -m latents.judge RUN_DIR --judge local:smollm2-135m
"""
