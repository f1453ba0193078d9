"""lmcycle.data"""
