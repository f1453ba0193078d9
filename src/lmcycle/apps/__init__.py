"""lmcycle.apps"""
