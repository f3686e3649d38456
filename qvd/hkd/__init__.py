"""
The HKD: the node daemon that starts, supervises and stops desktops.
"""
