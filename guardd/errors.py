"""guardd's one error tree.

Foreign exceptions (pydantic, OSError, ibapi, aiohttp, aiomqtt) are translated into these at the
boundary where they happen (``raise JournalError(...) from exc``); code above that boundary catches
only ``GuarddError`` subclasses. A risk breach is never an exception: rules return findings.

::

    GuarddError                    anything guardd raises on purpose             exit 70
     ├── ConfigError               bad configuration: key path + rule broken     exit 78
     ├── StartupError              cannot start: a port in use, state dir...     exit 71
     ├── BrokerError               talking to TWS / IB Gateway failed            exit 69
     │    ├── BrokerConnectError       cannot connect / handshake failed
     │    │    └── AccountNotManagedError  the login does not manage the account  exit 78
     │    └── BrokerDisconnectedError  dropped, or a request needs a connection
     ├── JournalError              the audit journal cannot be written or read   exit 74
     ├── LatchError                the kill latch file cannot be written         exit 74
     └── CommandError              a kill / arm command refused (HTTP 400)
          ├── AuthError            missing, wrong or under-privileged credential (401/403)
          └── ReplayError          stale timestamp, a nonce already seen, a retained command (MQTT)
               └── NonceNotDurableError  the nonce is not on disk: an arm is refused, a kill passes

Exit codes follow sysexits.h (70 EX_SOFTWARE, 78 EX_CONFIG, 71 EX_OSERR, 69 EX_UNAVAILABLE,
74 EX_IOERR). The systemd units list 78 and 71 in RestartPreventExitStatus: a broken config file
or a guard that cannot start (its control port taken by another process, its state directory not
writable) needs a person, and restarting it every two seconds would only hide the one clear line
it printed. Errors after start-up (a journal that stops being writable, IB errors) restart.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "EX_CONFIG",
    "EX_STARTUP",
    "AccountNotManagedError",
    "AuthError",
    "BrokerConnectError",
    "BrokerDisconnectedError",
    "BrokerError",
    "CommandError",
    "ConfigError",
    "GuarddError",
    "JournalError",
    "LatchError",
    "NonceNotDurableError",
    "ReplayError",
    "StartupError",
]

EX_CONFIG = 78
EX_STARTUP = 71  # EX_OSERR


class GuarddError(Exception):
    """Base of every error guardd raises on purpose; ``exit_code`` is what the daemon exits with."""

    exit_code: ClassVar[int] = 70  # EX_SOFTWARE


class ConfigError(GuarddError):
    """The configuration broke a rule: ``key_path`` names the key, ``rule`` says what is wrong.

    ``str(err)`` is ``"<key_path>: <rule>"`` (or just the rule when no single key is to blame, e.g.
    a TOML syntax error), followed by one line per further problem in ``more``, ready to print.
    """

    exit_code: ClassVar[int] = EX_CONFIG

    def __init__(self, key_path: str, rule: str, *, more: tuple[str, ...] = ()) -> None:
        self.key_path = key_path
        self.rule = rule
        self.more = more  # further problems found in the same file, each "<key_path>: <rule>"
        first = f"{key_path}: {rule}" if key_path else rule
        super().__init__("\n".join((first, *more)))


class StartupError(GuarddError):
    """The guard could not start for a reason outside its config file: its control or metrics
    port is in use, its state directory cannot be written, a journal cannot be opened. The
    daemon prints one line and exits 71, which the systemd units do not restart."""

    exit_code: ClassVar[int] = EX_STARTUP


class BrokerError(GuarddError):
    """Talking to TWS / IB Gateway failed."""

    exit_code: ClassVar[int] = 69  # EX_UNAVAILABLE


class BrokerConnectError(BrokerError):
    """Could not connect, the handshake failed, or the login does not manage the guarded account."""


class AccountNotManagedError(BrokerConnectError):
    """The login does not manage the configured account: a configuration mistake, not an outage,
    so the daemon stops with EX_CONFIG (systemd does not restart it) instead of retrying."""

    exit_code: ClassVar[int] = EX_CONFIG


class BrokerDisconnectedError(BrokerError):
    """The connection dropped, or a request was made while not connected."""


class JournalError(GuarddError):
    """The audit journal could not be written (the record is not durable) or could not be read."""

    exit_code: ClassVar[int] = 74  # EX_IOERR


class LatchError(GuarddError):
    """The kill latch state file could not be written durably."""

    exit_code: ClassVar[int] = 74  # EX_IOERR


class CommandError(GuarddError):
    """A kill / arm / status command was refused: malformed, or not allowed in this state."""


class AuthError(CommandError):
    """The command's credential is missing, wrong, or lacks the role the command needs."""


class ReplayError(CommandError):
    """A signed command's timestamp is outside the window, its nonce was already used, or it
    arrived as a retained message."""


class NonceNotDurableError(ReplayError):
    """A signed command's nonce could not be recorded on disk (or the record of earlier ones was
    lost), so a restarted guard could not refuse its replay: an arm is refused on it, a kill is
    carried out anyway (its replay can only halt again)."""
