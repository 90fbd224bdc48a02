"""Property-based tests: random models, events and schedules, every backend against the fp64 oracle.

Hypothesis draws whole training scenarios (tests/scenarios.py) and tests/lockstep.py replays
each one on the optimizer and on the independent oracle side by side, checking parameters,
momentum, base optimizer state, skipped-step counts and memory after every half-step.

CI runs the ``fsam-ci`` profile (tests/conftest.py): 150 examples per backend, derandomized, so
every run tests the same scenarios; triton runs 25 of them in the process that interprets its
kernels (tests/test_triton_interpreter_run.py). For a long local search:

    python -m pytest tests/test_properties.py --hypothesis-profile=fsam-thorough
    TRITON_INTERPRET=1 python -m pytest tests/test_properties.py -k triton --hypothesis-profile=fsam-thorough

(``fsam-thorough``: 2000 examples per backend, freshly random each run, failures kept in
``.hypothesis/`` and replayed first next time; add ``--hypothesis-seed=N`` to repeat a run.)
"""

from hypothesis import given

from tests.lockstep import Lockstep
from tests.scenarios import scenarios


@given(scenario=scenarios())
def test_random_scenarios_match_the_oracle_step_by_step(backend, scenario):
    Lockstep(scenario, backend).run()
