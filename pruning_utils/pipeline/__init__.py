"""The papermill pipeline: profiles, stage runner, memory plan, result tables and plots."""
