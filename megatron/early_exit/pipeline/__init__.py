"""Pipeline schedules with exit losses on any stage."""
