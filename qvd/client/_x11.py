"""
A tiny blocking X11 client: enough to probe a display, paint its root window
and take a screenshot, without xwd, xsetroot or python-xlib.

    with X11Connection.open(":5") as x:
        x.set_root_background(0x00FF00)      # 0xRRGGBB on a TrueColor root
        image = x.root_image()               # RGBImage(width, height, rgb bytes)
    write_png("shot.png", image)

Only local displays (C{:N}, unix or abstract socket) without authorisation
cookies or with one from C{XAUTHORITY}/C{~/.Xauthority} are supported. Call it
from a thread or a child process, never in the reactor thread.
"""

import os
import socket
import struct
import zlib

import attrs


class X11Error(Exception):
    """
    The display refused us or answered with an error; the message says which.
    """


@attrs.frozen
class RGBImage:
    width: int
    height: int
    rgb: bytes  # width * height * 3 bytes, row by row

    def is_black(self):
        return not self.rgb.strip(b"\x00")

    def count(self, colour, tolerance=8):
        """
        How many pixels are within C{tolerance} of C{colour} (0xRRGGBB).
        """
        r, g, b = (colour >> 16) & 255, (colour >> 8) & 255, colour & 255
        n = 0
        data = self.rgb
        for i in range(0, len(data), 3):
            if (abs(data[i] - r) <= tolerance and abs(data[i + 1] - g) <= tolerance
                    and abs(data[i + 2] - b) <= tolerance):
                n += 1
        return n


def _pad(n):
    return (4 - n % 4) % 4


def _display_number(display):
    host, _, rest = display.rpartition(":")
    if host not in ("", "unix"):
        raise X11Error(f"display {display!r} is not local (only :N is supported)")
    number = rest.split(".")[0]
    if not number.isdigit():
        raise X11Error(f"display {display!r} is not of the form :N")
    return int(number)


def _read_xauthority(number):
    path = os.environ.get("XAUTHORITY") or os.path.expanduser("~/.Xauthority")
    try:
        data = open(path, "rb").read()
    except OSError:
        return b"", b""
    i = 0
    hostname = socket.gethostname().encode()
    while i + 2 <= len(data):
        try:
            family = struct.unpack_from(">H", data, i)[0]
            i += 2
            fields = []
            for _ in range(4):
                (length,) = struct.unpack_from(">H", data, i)
                i += 2
                fields.append(data[i:i + length])
                i += length
        except struct.error:
            break
        address, num, name, cookie = fields
        if num == str(number).encode() and (family == 256 and address == hostname
                                            or family in (65535,)):
            return name, cookie
    return b"", b""


class X11Connection:
    def __init__(self, sock, setup):
        self.sock = sock
        self.setup = setup

    @classmethod
    def open(cls, display, timeout=5.0):
        number = _display_number(display)
        sock = None
        errors = []
        for address in ("\0/tmp/.X11-unix/X%d" % number, "/tmp/.X11-unix/X%d" % number):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(address)
                sock = s
                break
            except OSError as e:
                errors.append(str(e))
                s.close()
        if sock is None:
            raise X11Error(f"cannot connect to display {display}: {errors[-1]}")
        name, cookie = _read_xauthority(number)
        request = struct.pack("<BxHHHHxx", 0x6C, 11, 0, len(name), len(cookie))
        request += name + b"\0" * _pad(len(name)) + cookie + b"\0" * _pad(len(cookie))
        try:
            sock.sendall(request)
            head = _recv_exact(sock, 8)
            status, reason_len, _, _, length = struct.unpack("<BBHHH", head)
            body = _recv_exact(sock, length * 4)
        except OSError as e:
            sock.close()
            raise X11Error(f"display {display} did not answer: {e or type(e).__name__}")
        if status != 1:
            reason = body[:reason_len].decode("latin-1", "replace").strip()
            sock.close()
            raise X11Error(f"display {display} refused the connection: {reason}")
        return cls(sock, _parse_setup(body))

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, data):
        self.sock.sendall(data)

    def _reply(self):
        while True:
            head = _recv_exact(self.sock, 32)
            kind = head[0]
            if kind == 0:
                raise X11Error(f"X error code {head[1]} (request opcode {head[10]})")
            if kind == 1:
                (extra,) = struct.unpack_from("<I", head, 4)
                return head + _recv_exact(self.sock, extra * 4)
            # an event: ignore

    def sync(self):
        self._request(struct.pack("<BxH", 43, 1))  # GetInputFocus
        self._reply()

    def set_root_background(self, pixel):
        """
        Set the root window's background pixel and repaint it.
        """
        root = self.setup["root"]
        self._request(struct.pack("<BxHIII", 2, 4, root, 0x2, pixel))   # ChangeWindowAttributes
        self._request(struct.pack("<BBHIhhHH", 61, 0, 4, root, 0, 0, 0, 0))  # ClearArea
        self.sync()

    def root_image(self):
        """
        The root window as an L{RGBImage} (24/32-bit TrueColor only).
        """
        s = self.setup
        width, height = s["width"], s["height"]
        self._request(struct.pack("<BBHIhhHHI", 73, 2, 5, s["root"], 0, 0,
                                  width, height, 0xFFFFFFFF))
        reply = self._reply()
        depth = reply[1]
        data = reply[32:]
        bpp = s["formats"].get(depth)
        if depth not in (24, 32) or bpp != 32:
            raise X11Error(f"unsupported root depth {depth} ({bpp} bits per pixel)")
        stride = width * 4
        little = s["image_byte_order"] == 0
        out = bytearray(width * height * 3)
        for y in range(height):
            row = data[y * stride:(y + 1) * stride]
            if little:  # B G R X
                out[y * width * 3:(y + 1) * width * 3] = _bgrx_to_rgb(row)
            else:  # X R G B
                out[y * width * 3:(y + 1) * width * 3] = _xrgb_to_rgb(row)
        return RGBImage(width, height, bytes(out))


def _bgrx_to_rgb(row):
    out = bytearray(len(row) // 4 * 3)
    out[0::3] = row[2::4]
    out[1::3] = row[1::4]
    out[2::3] = row[0::4]
    return out


def _xrgb_to_rgb(row):
    out = bytearray(len(row) // 4 * 3)
    out[0::3] = row[1::4]
    out[1::3] = row[2::4]
    out[2::3] = row[3::4]
    return out


def _recv_exact(sock, n):
    chunks = []
    while n:
        try:
            chunk = sock.recv(min(n, 1 << 20))
        except OSError as e:
            raise X11Error(f"the X server did not answer: {e or type(e).__name__}")
        if not chunk:
            raise X11Error("the X server closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _parse_setup(body):
    (release, id_base, id_mask, motion, vendor_len, max_req, n_screens, n_formats,
     image_byte_order, bitmap_order, scan_unit, scan_pad, min_kc, max_kc) = \
        struct.unpack_from("<IIIIHHBBBBBBBB", body, 0)
    offset = 32 + vendor_len + _pad(vendor_len)
    formats = {}
    for _ in range(n_formats):
        depth, bpp, _pad_ = struct.unpack_from("<BBB", body, offset)
        formats[depth] = bpp
        offset += 8
    (root, colormap, white, black, masks, width, height) = struct.unpack_from(
        "<IIIIIHH", body, offset)
    return {"root": root, "width": width, "height": height, "formats": formats,
            "image_byte_order": image_byte_order, "white": white, "black": black}


def png_bytes(image):
    """
    Encode an L{RGBImage} as PNG (8-bit RGB, no filter).
    """
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    stride = image.width * 3
    raw = b"".join(b"\0" + image.rgb[y * stride:(y + 1) * stride]
                   for y in range(image.height))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", image.width, image.height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


def write_png(path, image):
    with open(path, "wb") as f:
        f.write(png_bytes(image))
