"""
Run commands inside a running KVM desktop through the QEMU guest agent, as
tests do with C{lxc-attach} for containers.

    agent = GuestAgent("qemu:///system", "qvdt-e2e123-4")
    agent.wait_ready(120)
    done = agent.run(["id", "-u"])               # as the guest's root
    done = agent.run_as("bob", ["cat", "/etc/shadow"])
    done.returncode, done.stdout, done.stderr

The domain needs the agent channel (C{vm.kvm.guest_agent = 1}) and the image
C{qemu-guest-agent} (L{qvd.testing.kvm_image.minimal_kvm_image} has it). The
calls block (libvirt's agent commands are synchronous): call them from a
thread in a reactor's process.
"""

import base64
import json
import subprocess
import time

import libvirt
import libvirt_qemu


class GuestAgentError(Exception):
    """
    The guest agent did not answer or refused a command; the message says which.
    """


class GuestAgent:

    def __init__(self, uri, domain):
        self.uri = uri
        self.domain = domain

    def _command(self, execute, arguments=None, timeout=10):
        message = {"execute": execute}
        if arguments is not None:
            message["arguments"] = arguments
        conn = libvirt.open(self.uri)
        try:
            dom = conn.lookupByName(self.domain)
            answer = libvirt_qemu.qemuAgentCommand(dom, json.dumps(message), int(timeout), 0)
        except libvirt.libvirtError as e:
            raise GuestAgentError(f"{execute} in {self.domain}: {e.get_error_message()}")
        finally:
            conn.close()
        return json.loads(answer)["return"]

    def wait_ready(self, timeout):
        """
        Wait until the guest agent answers a ping; the seconds it took.
        """
        start = time.monotonic()
        while True:
            try:
                self._command("guest-ping", timeout=5)
                return time.monotonic() - start
            except GuestAgentError as e:
                if time.monotonic() - start > timeout:
                    raise GuestAgentError(f"no guest agent in {self.domain} after {timeout} s: {e}")
                time.sleep(1)

    def run(self, argv, timeout=30):
        """
        Run C{argv} as the guest's root; a L{subprocess.CompletedProcess}
        (text) once it exited.
        """
        started = self._command("guest-exec", {
            "path": argv[0], "arg": list(argv[1:]), "capture-output": True})
        deadline = time.monotonic() + timeout
        while True:
            status = self._command("guest-exec-status", {"pid": started["pid"]})
            if status.get("exited"):
                break
            if time.monotonic() > deadline:
                raise GuestAgentError(f"{argv!r} still runs in {self.domain} after {timeout} s")
            time.sleep(0.1)

        def text(key):
            return base64.b64decode(status.get(key, "")).decode(errors="replace")
        code = status.get("exitcode", -status.get("signal", 0) or 0)
        return subprocess.CompletedProcess(argv, code, text("out-data"), text("err-data"))

    def run_as(self, user, argv, timeout=30):
        """
        Run C{argv} as C{user} (a login of the guest, or C{root}) with that
        user's ids and groups and a clean environment.
        """
        if user == "root":
            return self.run(argv, timeout)
        return self.run(["/usr/bin/setpriv", f"--reuid={user}", f"--regid={user}",
                         "--init-groups", "--reset-env", "--", *argv], timeout)
