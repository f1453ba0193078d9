"""lmcycle.align"""
