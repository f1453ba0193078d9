"""lmcycle.optimize"""
