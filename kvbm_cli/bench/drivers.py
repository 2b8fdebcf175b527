"""External load generators: aiperf (genai-perf's successor) and genai-perf, imported into our result files.

Operations:
  run_external(driver, workload, cfg, ...)   run the tool with the same workload flags, import its export
  import_aiperf(export_dir, ...)             aiperf's per-request records -> RequestRecords
"""
