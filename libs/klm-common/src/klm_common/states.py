"""Key and key-version states (NIST SP 800-57 Pt 1 §5.3 / KMIP) and the one transition function.

::

    pre-active → active ⇄ suspended → deactivated → destroyed
    any of the first four → compromised → destroyed-compromised
    active or compromised —rekey→ active   (rotation: a new primary version)

A key's state is its primary version's. Re-keying (rotation) adds a new, active primary
version: an active key stays active, and a compromised key is replaced by a fresh version
(SP 800-57 Pt 1 §5.3.5: a compromised key is replaced) while its compromised versions stay
compromised, able to process (verify/decrypt) but never to protect again.

Every service decides "may this happen?" with :func:`transition`; nothing else encodes the graph.
"""

from __future__ import annotations

from enum import StrEnum

from klm_common.errors import IllegalTransition


class KeyState(StrEnum):
    PRE_ACTIVE = "pre-active"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    DEACTIVATED = "deactivated"
    COMPROMISED = "compromised"
    DESTROYED = "destroyed"
    DESTROYED_COMPROMISED = "destroyed-compromised"


class Transition(StrEnum):
    ACTIVATE = "activate"
    SUSPEND = "suspend"
    REACTIVATE = "reactivate"
    DEACTIVATE = "deactivate"
    COMPROMISE = "compromise"
    DESTROY = "destroy"
    REKEY = "rekey"


_S = KeyState
_T = Transition

_ALLOWED: dict[tuple[KeyState, Transition], KeyState] = {
    (_S.PRE_ACTIVE, _T.ACTIVATE): _S.ACTIVE,
    (_S.ACTIVE, _T.SUSPEND): _S.SUSPENDED,
    (_S.SUSPENDED, _T.REACTIVATE): _S.ACTIVE,
    (_S.ACTIVE, _T.DEACTIVATE): _S.DEACTIVATED,
    (_S.SUSPENDED, _T.DEACTIVATE): _S.DEACTIVATED,
    # a pre-active key that will never be used may be deactivated (SP 800-57 §5.3.4)
    (_S.PRE_ACTIVE, _T.DEACTIVATE): _S.DEACTIVATED,
    (_S.DEACTIVATED, _T.DESTROY): _S.DESTROYED,
    # SP 800-57 allows destroying a pre-active key that was never activated
    (_S.PRE_ACTIVE, _T.DESTROY): _S.DESTROYED,
    (_S.PRE_ACTIVE, _T.COMPROMISE): _S.COMPROMISED,
    (_S.ACTIVE, _T.COMPROMISE): _S.COMPROMISED,
    (_S.SUSPENDED, _T.COMPROMISE): _S.COMPROMISED,
    (_S.DEACTIVATED, _T.COMPROMISE): _S.COMPROMISED,
    (_S.COMPROMISED, _T.DESTROY): _S.DESTROYED_COMPROMISED,
    (_S.ACTIVE, _T.REKEY): _S.ACTIVE,
    (_S.COMPROMISED, _T.REKEY): _S.ACTIVE,
}

TERMINAL_STATES = frozenset({_S.DESTROYED, _S.DESTROYED_COMPROMISED})

#: states whose key may apply new protection (encrypt, sign, wrap, mac)
PROTECT_STATES = frozenset({_S.ACTIVE})
#: states whose key may still process protected data (decrypt, verify, unwrap)
PROCESS_STATES = frozenset({_S.ACTIVE, _S.DEACTIVATED, _S.COMPROMISED})


def transition(state: KeyState, action: Transition) -> KeyState:
    """Return the state after ``action``, or raise :class:`IllegalTransition`."""
    try:
        return _ALLOWED[(state, action)]
    except KeyError:
        raise IllegalTransition(
            f"cannot {action.value} a key that is {state.value}",
            current_state=state.value,
            action=action.value,
        ) from None


def allowed_actions(state: KeyState) -> list[Transition]:
    """The actions legal from ``state`` (for error messages, CLIs and docs)."""
    return [t for (s, t) in _ALLOWED if s == state]
