import pytest

from klm_common.errors import IllegalTransition
from klm_common.states import KeyState, Transition, allowed_actions, transition

S, T = KeyState, Transition


@pytest.mark.parametrize(("state", "action", "after"), [
    (S.PRE_ACTIVE, T.ACTIVATE, S.ACTIVE),
    (S.ACTIVE, T.SUSPEND, S.SUSPENDED),
    (S.SUSPENDED, T.REACTIVATE, S.ACTIVE),
    (S.ACTIVE, T.DEACTIVATE, S.DEACTIVATED),
    (S.DEACTIVATED, T.DESTROY, S.DESTROYED),
    (S.ACTIVE, T.COMPROMISE, S.COMPROMISED),
    (S.DEACTIVATED, T.COMPROMISE, S.COMPROMISED),
    (S.COMPROMISED, T.DESTROY, S.DESTROYED_COMPROMISED),
    (S.ACTIVE, T.REKEY, S.ACTIVE),
    (S.COMPROMISED, T.REKEY, S.ACTIVE),
])
def test_allowed_transitions(state: KeyState, action: Transition, after: KeyState) -> None:
    assert transition(state, action) is after


@pytest.mark.parametrize(("state", "action"), [
    (S.DESTROYED, T.REACTIVATE),
    (S.DESTROYED, T.ACTIVATE),
    (S.ACTIVE, T.DESTROY),  # must be deactivated first
    (S.COMPROMISED, T.REACTIVATE),
    (S.DESTROYED_COMPROMISED, T.COMPROMISE),
    (S.DEACTIVATED, T.ACTIVATE),
    (S.SUSPENDED, T.REKEY),
    (S.DEACTIVATED, T.REKEY),
])
def test_illegal_transitions_carry_code_and_current_state(state: KeyState,
                                                          action: Transition) -> None:
    with pytest.raises(IllegalTransition) as info:
        transition(state, action)
    assert info.value.code == "illegal_transition"
    assert info.value.details["current_state"] == state.value


def test_terminal_states_allow_nothing() -> None:
    assert allowed_actions(S.DESTROYED) == []
    assert allowed_actions(S.DESTROYED_COMPROMISED) == []
