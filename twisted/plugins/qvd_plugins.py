"""
twistd plugins: one ServiceMaker per qvd daemon (twistd qvd-l7r, qvd-hkd, qvd-vma).
"""

from twisted.application.service import ServiceMaker

qvdL7R = ServiceMaker(
    "qvd L7R", "qvd.l7r.tap", "The qvd front door: TLS, QVD client protocol, NX relay.",
    "qvd-l7r")
qvdHKD = ServiceMaker(
    "qvd HKD", "qvd.hkd.tap", "The qvd node daemon: starts, supervises and stops desktops.",
    "qvd-hkd")
qvdVMA = ServiceMaker(
    "qvd VMA", "qvd.vma.tap", "The qvd agent inside a desktop: runs nxagent.",
    "qvd-vma")
