"""lmcycle.serve"""
