"""Test-session settings: auto keeps its fixed rules unless a test opts into measured tuning, so results do not
depend on a tuning table a developer's earlier runs left in the user cache."""

import os

os.environ["MOERUN_TUNING"] = "0"
