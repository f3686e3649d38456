"""
python -m qvd.client ...  is the same as qvd-client ...
"""
from qvd.client.cli import main

main()
