"""A throwaway Dovecot IMAP server on free 127.0.0.1 ports, for the relay tests.

A passwd-file user, Maildir storage in a temporary directory, mail uid 65534 (Dovecot refuses
uid 0), plain IMAP and IMAPS (a self-signed CA made here). Started in the foreground and
stopped by its pid.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "relay"
PASSWORD = "relay-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dtools test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


class Dovecot:
    def __init__(self, binary: str, append_limit: int | None = None):
        self.binary = binary
        self.append_limit = append_limit
        # Not under pytest's 0700 tmp: the mail uid must reach its Maildir. Short, for socket paths.
        self.dir = Path(tempfile.mkdtemp(prefix="dtdc-"))
        self.dir.chmod(0o755)
        self.port = free_port()
        self.ssl_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.ca: Path | None = None

    @property
    def url(self) -> str:
        return f"imap://{USER}@127.0.0.1:{self.port}/dtools"

    @property
    def ssl_url(self) -> str:
        return f"imaps://{USER}@127.0.0.1:{self.ssl_port}/dtools"

    def env(self) -> dict[str, str]:
        return {"DTOOLS_RELAY_PASSWORD": PASSWORD}

    def maildir(self) -> Path:
        return self.dir / "mail" / USER / "Maildir"

    def start(self) -> "Dovecot":
        d = self.dir
        for sub in ("run", "state", "mail"):
            (d / sub).mkdir()
        if os.geteuid() == 0:
            uid = gid = 65534
            internal, login = "dovecot", "dovenull"
        else:
            uid, gid = os.getuid(), os.getgid()
            internal = login = pwd.getpwuid(uid).pw_name
        os.chown(d / "mail", uid, gid)
        (d / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
        self.ca, cert, key = _make_tls(d)
        quota = ""
        if self.append_limit:
            quota = (f"mail_plugins = $mail_plugins quota\nprotocol imap {{\n  mail_plugins = $mail_plugins imap_quota\n}}\n"
                     f"plugin {{\n  quota = maildir:User quota\n  quota_rule = *:storage=1G\n"
                     f"  quota_max_mail_size = {self.append_limit}\n}}\n"
                     f"imap_capability = +APPENDLIMIT={self.append_limit}\n")
        (d / "dovecot.conf").write_text(f"""
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
default_internal_user = {internal}
default_login_user = {login}
first_valid_uid = 1
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = no
auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/mail/%u
}}
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  separator = /
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.ssl_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
{quota}
""")
        self.proc = subprocess.Popen([self.binary, "-F", "-c", str(d / "dovecot.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited: {self.proc.stderr.read().decode()} {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"* OK"):
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("dovecot did not start listening within 15 s: " + self.log())

    def log(self) -> str:
        try:
            return (self.dir / "dovecot.log").read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def message_files(self, folder: str = "dtools/site-b") -> list[Path]:
        """Files of a folder in the server's Maildir (Maildir++ layout: .dtools.site-b)."""
        base = self.maildir() / ("." + folder.replace("/", "."))
        return [p for sub in ("new", "cur") if (base / sub).exists() for p in (base / sub).iterdir()]

    def __enter__(self) -> "Dovecot":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
