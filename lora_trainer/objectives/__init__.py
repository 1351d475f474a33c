"""The training objectives the families build: DDPM epsilon / v with min-SNR (ddpm.py) and rectified flow (flow.py)."""
