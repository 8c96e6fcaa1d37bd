from tests.late_chord import *  # noqa: F403
