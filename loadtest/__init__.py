"""Load-test and benchmark tools users run against their own gateway."""
