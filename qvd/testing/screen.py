"""
What an X display shows, for tests: L{colour_fraction}.

    colour_fraction(":5", (0x2A, 0x7F, 0xD4))   # 0.0 .. 1.0
"""

import subprocess

#: ImageMagick's convert (/usr/local/bin/convert on our machines is a stand-in).
CONVERT = "/usr/bin/convert"


def colour_fraction(display, colour):
    """
    The fraction of the root window of X display C{display} (":N" or N)
    whose pixels are exactly C{colour} (an (r, g, b) tuple); 0.0 when the
    display cannot be read.
    """
    display = f":{display}" if not str(display).startswith(":") else str(display)
    xwd = subprocess.run(["xwd", "-root", "-display", display], capture_output=True, timeout=20)
    if xwd.returncode != 0:
        return 0.0
    rgb = subprocess.run([CONVERT, "xwd:-", "-depth", "8", "rgb:-"], input=xwd.stdout,
                         capture_output=True, timeout=20).stdout
    pixels = len(rgb) // 3
    target = bytes(colour)
    hits = sum(1 for i in range(0, pixels * 3, 3) if rgb[i:i + 3] == target)
    return hits / max(pixels, 1)
