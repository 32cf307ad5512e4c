"""raytrain: data-parallel PyTorch training on CPUs with Ray Train.

python -m raytrain.main --workers 4                     # embedded Ray on this machine
python -m raytrain.main --workers 8 --address auto      # an existing Ray cluster
"""

__version__ = "0.1.0"
