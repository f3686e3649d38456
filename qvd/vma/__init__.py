"""
The VMA: the agent inside each desktop (SimpleRPC on port 3030, nxagent).
"""
