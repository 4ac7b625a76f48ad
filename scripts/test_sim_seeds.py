"""Tests of scripts/sim_seeds.py's reading of the scenario test's printout
and of its seed-against-seed verdicts (`make test` runs them)."""

import argparse
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sim_seeds  # noqa: E402

# As admission_scenarios prints one seed (SIM_SEEDS=1) with SIM_PRINT keys:
# a phase name with a space, a bound's line and a SIM_PRINT line.
PRINTOUT = """
running 1 test
test admission_scenarios_meet_their_expected_ranges ...
53_fleet_of_3_cold_start_into_5x_on_16_workers: three instances cold together into 5x: purchases no slower
  first second purchase_p99_ms                     162.372  in [0, 175] ok (in 1 of 1)
  first second merchant_refusal_p99_ms              91.500  in [0, 90] MISS (in 0 of 1)
  5x         goodput                               0.961  (SIM_PRINT)

46_slow_noisy_backend_cold_at_0.8x: one instance cold at 0.8x: nothing is shed
  0.8x       customer_service_success              0.652  in [1, 1] MISS (in 0 of 1)
2 misses:
46_slow_noisy_backend_cold_at_0.8x/0.8x: customer_service_success = 0.652 (median of 1 seeds; held in 0), expected [1, 1]
"""


class ParseOutput(unittest.TestCase):
    def test_reads_every_phase_and_key_including_phases_with_spaces(self):
        found = sim_seeds.parse_output(PRINTOUT)
        self.assertEqual(found, {
            "53_fleet_of_3_cold_start_into_5x_on_16_workers/first second/purchase_p99_ms": 162.372,
            "53_fleet_of_3_cold_start_into_5x_on_16_workers/first second/merchant_refusal_p99_ms": 91.5,
            "53_fleet_of_3_cold_start_into_5x_on_16_workers/5x/goodput": 0.961,
            "46_slow_noisy_backend_cold_at_0.8x/0.8x/customer_service_success": 0.652,
        })

    def test_nothing_outside_a_scenario_block_is_read(self):
        self.assertEqual(sim_seeds.parse_output("  0.8x  goodput  0.5  ok\n"), {})


class Verdicts(unittest.TestCase):
    def test_a_latency_is_better_when_five_percent_lower(self):
        self.assertEqual(sim_seeds.better_worse("x/3x/purchase_p99_ms", 100.0, 94.0), (True, False))
        self.assertEqual(sim_seeds.better_worse("x/3x/purchase_p99_ms", 100.0, 104.0), (False, False))
        self.assertEqual(sim_seeds.better_worse("x/3x/purchase_p99_ms", 100.0, 106.0), (False, True))

    def test_a_fraction_is_better_when_higher(self):
        self.assertEqual(sim_seeds.better_worse("x/0.8x/goodput", 0.90, 0.91), (True, False))
        self.assertEqual(sim_seeds.better_worse("x/0.8x/goodput", 0.90, 0.89), (False, True))


class Seeds(unittest.TestCase):
    def test_ranges_and_lists(self):
        self.assertEqual(sim_seeds.parse_seeds("3-5"), [3, 4, 5])
        self.assertEqual(sim_seeds.parse_seeds("0,7"), [0, 7])

    def test_a_backwards_range_is_refused_with_what_was_given(self):
        with self.assertRaisesRegex(argparse.ArgumentTypeError, "'5-3'"):
            sim_seeds.parse_seeds("5-3")


class Past(unittest.TestCase):
    def test_counts_only_the_seeds_past_the_bound(self):
        values = {"3": 900.0, "10": 1200.0, "4": 1000.0, "7": 1500.5}
        self.assertEqual(sim_seeds.past(values, over=1000.0), ["7", "10"])
        self.assertEqual(sim_seeds.past(values, under=1000.0), ["3"])
        self.assertEqual(sim_seeds.past({}, over=1.0), [])


if __name__ == "__main__":
    unittest.main()
