"""lmcycle.evals"""
